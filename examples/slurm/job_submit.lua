--[[
hpcstage bridge for Slurm's job_submit/lua plugin (JobSubmitPlugins=lua).

The hpcstage daemon runs as an unprivileged service account, so it cannot read batch scripts.
This script runs inside slurmctld at submission, finds the job's staging directives and copies
them into the job's admin_comment, which every user (and so the daemon) can read with squeue
but only administrators can set: a user cannot forge another job's directives.

Directives are taken from:
  * the leading comment block of the batch script: "#HPCSTAGE --stage-in=..." and
    "#SBATCH --stage-in=..." lines (sbatch's own rule: scanning stops at the first line that
    is neither blank nor a comment);
  * the SPANK plugin's values, if it is installed: sbatch passes them with
    spank_job_control_setenv, and they arrive here as job_desc.spank_job_env entries
    "HPCSTAGE_STAGE_IN_<n>=value" / "HPCSTAGE_STAGE_OUT_<n>=value" (n from 0, no prefix;
    verified with Slurm 22.05). With the plugin, sbatch itself parsed the script's #SBATCH
    lines, so when these entries exist the #SBATCH lines are not read again (they would be
    duplicates); #HPCSTAGE lines always are.

Strict mode (STRICT below): a job with directives also gets the burst-buffer spec
STRICT_BB_SPEC, so that burst_buffer/lua with examples/slurm/burst_buffer.lua holds it
pending until its inputs are staged. Requires BurstBufferType=burst_buffer/lua.

Format written (read by hpcstage.core.directives.decode_admin_comment):
  hpcstage:v1:in=<pct-encoded value>;out=<pct-encoded value>;...;end
A word on a #HPCSTAGE line that is no staging option (a typo such as --stage_in=...) is
passed on as bad=<pct-encoded word>, so that the job fails with it instead of running
without that input (sbatch itself refuses unknown options on #SBATCH lines).
Validation happens in the daemon, which reports malformed directives by name in
`hpcstage status` and fails the job at `hpcstage env`. Lua 5.1 compatible.
]]

-- Site settings ------------------------------------------------------------------------
local STRICT = false               -- true: Slurm holds jobs until their data is staged
local STRICT_BB_SPEC = "#BB_LUA hpcstage"  -- must start with burst_buffer.conf's Directive
-- --------------------------------------------------------------------------------------

local MARK = "hpcstage:v1:"
local MAX_SCAN_LINES = 10000

local function pct_encode(value)
  return (value:gsub("[^%w%-%._~/:=,@%+]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end

-- Split a directive line into words as sbatch (and the daemon) do: whitespace separates,
-- quotes group, a backslash makes the next character literal, and an unquoted # starts a
-- comment ("#HPCSTAGE --stage-in=s3://b/p/   # the inputs"). nil when a quote is left open.
local SPACE = { [" "] = true, ["\t"] = true, ["\n"] = true, ["\v"] = true, ["\f"] = true,
                ["\r"] = true }
local function words(text)
  local out, word, in_word, quote = {}, {}, false, nil
  local i = 1
  while i <= #text do
    local c = text:sub(i, i)
    if quote ~= nil and c == quote then
      quote = nil
    elseif quote ~= nil then
      word[#word + 1] = c
    elseif SPACE[c] then
      if in_word then out[#out + 1] = table.concat(word) end
      word, in_word = {}, false
    elseif c == "#" then
      break
    else
      in_word = true
      if c == '"' or c == "'" then
        quote = c
      elseif c == "\\" then
        i = i + 1
        word[#word + 1] = text:sub(i, i)
      else
        word[#word + 1] = c
      end
    end
    i = i + 1
  end
  if quote ~= nil then return nil end
  if in_word then out[#out + 1] = table.concat(word) end
  return out
end

-- strict: every word must be a staging option (#HPCSTAGE lines); others are recorded as
-- bad=<word> for the daemon to refuse. #SBATCH lines also carry sbatch's own options.
local function add_options(items, option_words, strict)
  local i = 1
  while i <= #option_words do
    local w = option_words[i]
    local kind, value = w:match("^%-%-stage%-(%a+)=(.*)$")
    if kind == nil then
      kind = w:match("^%-%-stage%-(%a+)$")
      if kind ~= nil then
        i = i + 1
        value = option_words[i] or ""
      end
    end
    if kind == "in" or kind == "out" then
      items[#items + 1] = kind .. "=" .. pct_encode(value)
    elseif strict then
      items[#items + 1] = "bad=" .. pct_encode(w)
    end
    i = i + 1
  end
end

local function from_script(script, items, read_sbatch)
  if script == nil then return end
  local n = 0
  for line in (script .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if n > MAX_SCAN_LINES then break end
    -- Read as the daemon reads a script: a '\r' is a blank like any other (so a final
    -- "\\\r" keeps its '\r', which the daemon then refuses as a control character).
    local stripped = line
    if n == 1 and stripped:match("^#!") then
      -- the interpreter line
    elseif stripped:match("^%s*$") then
      -- blank lines do not end the block
    elseif not stripped:match("^%s*#") then
      break  -- an indented comment (sbatch and the daemon read on) does not end the block
    else
      -- A bare prefix, as sbatch reads "#SBATCH": "#HPCSTAGE--stage-in=..." is a directive
      -- and "#HPCSTAGEfoo" a refused word, as for the daemon reading the script.
      local rest = stripped:match("^#HPCSTAGE(.*)$")
      if rest ~= nil then
        local found = words(rest)
        if found == nil then  -- an open quote: the daemon refuses the line by its text
          items[#items + 1] = "bad=" .. pct_encode((rest:gsub("^%s+", "")))
        else
          add_options(items, found, true)
        end
      elseif read_sbatch then
        rest = stripped:match("^#SBATCH%s+(.*)$")
        if rest ~= nil then add_options(items, words(rest) or {}, false) end
      end
    end
  end
end

local function from_spank(env, items)
  if env == nil then return end
  local found = {}
  -- spank_job_env is 0-indexed: iterate with pairs, then sort for a stable order.
  for _, entry in pairs(env) do
    local kind, idx, value = tostring(entry):match("^HPCSTAGE_STAGE_(%u+)_(%d+)=(.*)$")
    if kind == "IN" or kind == "OUT" then
      found[#found + 1] = { kind = kind:lower(), idx = tonumber(idx), value = value }
    end
  end
  table.sort(found, function(a, b)
    if a.kind ~= b.kind then return a.kind < b.kind end
    return a.idx < b.idx
  end)
  for _, f in ipairs(found) do items[#items + 1] = f.kind .. "=" .. pct_encode(f.value) end
end

-- Remove an earlier hpcstage block (e.g. on job update) and keep the site's own text.
local function strip_block(comment)
  if comment == nil then return "" end
  return (comment:gsub("%s*hpcstage:v%d+:%S*", ""))
end

-- Add the strict-mode burst-buffer spec once (a job may carry other #BB_LUA lines).
local function add_bb_spec(job_desc)
  local bb = job_desc.burst_buffer
  if bb ~= nil and bb:find(STRICT_BB_SPEC, 1, true) then return end
  if bb == nil or bb == "" then
    job_desc.burst_buffer = STRICT_BB_SPEC
  else
    job_desc.burst_buffer = bb .. "\n" .. STRICT_BB_SPEC
  end
end

function slurm_job_submit(job_desc, part_list, submit_uid)
  local spank_items = {}
  from_spank(job_desc.spank_job_env, spank_items)
  local items = {}
  from_script(job_desc.script, items, #spank_items == 0)
  for _, item in ipairs(spank_items) do items[#items + 1] = item end
  if #items == 0 then return slurm.SUCCESS end
  if STRICT then add_bb_spec(job_desc) end
  local block = MARK .. table.concat(items, ";") .. ";end"
  local kept = strip_block(job_desc.admin_comment)
  if kept ~= "" then block = kept .. " " .. block end
  job_desc.admin_comment = block
  slurm.log_debug("hpcstage: %d staging directive(s) recorded for uid %s", #items,
                  tostring(submit_uid))
  return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
  return slurm.SUCCESS
end

return slurm.SUCCESS
