--[[
hpcstage strict mode for Slurm's burst_buffer/lua plugin (BurstBufferType=burst_buffer/lua).

Slurm itself holds a job until the hpcstage daemon has staged its inputs: the job stays
PENDING with Reason=BurstBufferStageIn while its data is fetched onto the nodes Slurm plans
for it, and its script starts only once the data is on the nodes it really got. The daemon
does all the work; these hooks only ask it, through the `hpcstage` command (as SlurmUser,
which must be one of the API's admins: `[api] admins` in the site config).

Jobs take part when their burst-buffer spec holds the line "#BB_LUA hpcstage" (BB_LINE
below), which examples/slurm/job_submit.lua adds to every job with staging directives when
its STRICT is true. Other burst-buffer jobs pass through every hook untouched.

Hooks, with Slurm's calling conventions (22.05; 24.05+ adds uid, gid, job_info arguments
and the test_data_in/test_data_out polls). Each returns slurm.SUCCESS or slurm.ERROR, and
an optional message that Slurm shows as the job's reason on error:
  slurm_bb_job_process   (sync, at submit)   nothing: the daemon validates directives
  slurm_bb_pools         (sync)              no pools: hpcstage is not a capacity allocator
  slurm_bb_setup         (async, pending)    nothing
  slurm_bb_data_in       (async, pending)    22.05: wait (bounded) until the inputs are on
                                             the planned nodes; 24.05+: wait only until the
                                             daemon knows the job, then return
  slurm_bb_test_data_in  (24.05+, polled)    BUSY while staging; done when staged; error
                                             (job held, reason = the cause) on failure
  slurm_bb_real_size     (async)             nothing
  slurm_bb_paths         (sync, at start)    HPCSTAGE_DIR into the job's environment
  slurm_bb_pre_run       (async, CONFIGURING) wait until every allocated node holds the
                                             inputs (tops up a node the plan missed)
  slurm_bb_post_run      (async)             nothing
  slurm_bb_data_out      (async, STAGE_OUT)  returns at once, see below
  slurm_bb_test_data_out (24.05+, polled)    done
  slurm_bb_job_teardown  (async)             nothing: leases end with the job
  slurm_bb_get_status    (scontrol show bbstat JOBID)  `hpcstage status JOBID` as the uid
                                             that asks (24.05+; 22.05 does not say who)

Every hook is idempotent: Slurm repeats stage-in after a slurmctld restart, and asking the
daemon twice changes nothing. Stage-out: the daemon uploads a job's outputs as soon as Slurm
reports the job ended, and Slurm reports that only after slurm_bb_data_out returns, so
data_out must not wait for it (it would deadlock until StageOutTimeout).

Lua 5.1 compatible (Debian 12's Slurm links Lua 5.1); no module beyond the standard library.
]]

-- Site settings ------------------------------------------------------------------------
local HPCSTAGE = "/opt/hpcstage/bin/hpcstage"      -- the hpcstage command
local CONFIG = "/etc/hpcstage/site.toml"           -- the daemon's site configuration
-- Node-local staging root as in the config's nodes.cache_dir; "{node}" is replaced by the
-- node's name when the job has one node (slurm_bb_paths cannot ask anyone: it runs inside
-- slurmctld and must return at once).
local CACHE_DIR = "/local/hpcstage"
local STAGE_IN_WAIT = 3600   -- 22.05: seconds data_in waits (keep below StageInTimeout)
local PRE_RUN_WAIT = 1800    -- seconds pre_run waits for the allocated nodes
local UNPLANNED_GRACE = 20   -- seconds without planned nodes before data_in lets Slurm go on
local POLL = 2               -- seconds between questions to the daemon
local BB_LINE = "#BB_LUA hpcstage"
-- --------------------------------------------------------------------------------------

local NAME = "hpcstage burst_buffer.lua"
local NEW_API = slurm.SLURM_BB_BUSY ~= nil  -- 24.05+: test_data_in/test_data_out polls

local function log(fmt, ...)
  slurm.log_info("hpcstage: " .. fmt, ...)
end

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Run a shell command; its output (stdout and stderr) and whether it exited 0.
local function run(cmd)
  local f = io.popen(cmd .. " 2>&1; echo \"__rc=$?\"")
  if f == nil then return false, "cannot run " .. cmd end
  local out = f:read("*a") or ""
  f:close()
  local body, rc = out:match("^(.-)__rc=(%d+)%s*$")
  if body == nil then return false, out end
  return tonumber(rc) == 0, body
end

local function last_line(text)
  local last = ""
  for line in tostring(text):gmatch("[^\n]+") do
    if line:match("%S") then last = line end
  end
  return last
end

local function sleep(seconds)
  os.execute("sleep " .. tonumber(seconds))
end

-- A small JSON reader (objects, arrays, strings, numbers, true/false/null) for the
-- daemon's documents: Lua 5.1 has none and sites should not need a module for it.
local json_value

local function json_skip(s, i)
  return (s:find("[^ \t\r\n]", i)) or (#s + 1)
end

local ESCAPES = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function json_string(s, i)
  local out, j = {}, i + 1
  while true do
    local c = s:sub(j, j)
    if c == "" then error("unterminated string") end
    if c == '"' then return table.concat(out), j + 1 end
    if c == "\\" then
      local e = s:sub(j + 1, j + 1)
      if e == "u" then
        local code = tonumber(s:sub(j + 2, j + 5), 16) or 63
        out[#out + 1] = code < 128 and string.char(code) or "?"
        j = j + 6
      else
        out[#out + 1] = ESCAPES[e] or e
        j = j + 2
      end
    else
      out[#out + 1] = c
      j = j + 1
    end
  end
end

local function json_list(s, i, close, item)
  i = json_skip(s, i + 1)
  if s:sub(i, i) == close then return i + 1 end
  while true do
    i = item(i)
    i = json_skip(s, i)
    local c = s:sub(i, i)
    if c == close then return i + 1 end
    if c ~= "," then error("expected ',' or '" .. close .. "' at " .. i) end
    i = json_skip(s, i + 1)
  end
end

json_value = function(s, i)
  i = json_skip(s, i)
  local c = s:sub(i, i)
  if c == "{" then
    local obj = {}
    local after = json_list(s, i, "}", function(j)
      local key
      key, j = json_string(s, j)
      j = json_skip(s, j)
      if s:sub(j, j) ~= ":" then error("expected ':' at " .. j) end
      obj[key], j = json_value(s, j + 1)
      return j
    end)
    return obj, after
  elseif c == "[" then
    local arr = {}
    local after = json_list(s, i, "]", function(j)
      local v
      v, j = json_value(s, j)
      arr[#arr + 1] = v
      return j
    end)
    return arr, after
  elseif c == '"' then
    return json_string(s, i)
  end
  local word = s:match("^[%w%.%+%-]+", i)
  if word == nil then error("unexpected '" .. c .. "' at " .. i) end
  if word == "true" then return true, i + 4 end
  if word == "false" then return false, i + 5 end
  if word == "null" then return nil, i + 4 end
  return tonumber(word), i + #word
end

local function json_decode(text)
  local ok, value = pcall(json_value, text, 1)
  if ok then return value end
  return nil
end

-- The daemon's view of the job: the document of `hpcstage status JOB --json`, or nil and why.
local function job_doc(job_id)
  local cmd = string.format("%s status --config %s --json %s", shell_quote(HPCSTAGE),
                            shell_quote(CONFIG), shell_quote(job_id))
  local ok, out = run(cmd)
  if not ok then return nil, last_line(out) end
  local doc = json_decode(out)
  if type(doc) ~= "table" then return nil, "unreadable answer from `hpcstage status`" end
  return doc
end

-- "failed", why | "ready" | "unplanned" | "busy", progress
local function staging_state(doc)
  if doc.failure and doc.failure ~= "" then return "failed", doc.failure end
  if doc.error and doc.error ~= "" then return "failed", "directive refused: " .. doc.error end
  local staging = doc.staging or {}
  -- A node the daemon dropped (its own failure, not the data's) is not waited for: the job
  -- may well start elsewhere, where it is staged at once (docs/slurm-integration.md).
  local planned = {}
  for _, node in ipairs(doc.planned_nodes or {}) do
    if staging[node] ~= "dropped" then planned[#planned + 1] = node end
  end
  if #planned == 0 then return "unplanned" end
  local waiting = {}
  for _, node in ipairs(planned) do
    if staging[node] ~= "ready" then waiting[#waiting + 1] = node end
  end
  if #waiting == 0 then return "ready" end
  return "busy", "staging on " .. table.concat(waiting, ",")
end

-- Does this job take part? Its burst-buffer spec is in the script Slurm hands us.
local function wants_us(job_script)
  local f = io.open(job_script or "", "r")
  if f == nil then return false end
  local text = f:read("*a") or ""
  f:close()
  return text:find(BB_LINE, 1, true) ~= nil
end

-- Ask until the daemon knows the job and says failed/ready, or `limit` seconds have passed
-- (or, with unplanned_ok, the job has had no planned nodes for UNPLANNED_GRACE seconds).
local function wait_staged(job_id, limit, unplanned_ok)
  local start, unplanned_since, last = os.time(), nil, "the daemon does not know the job yet"
  while true do
    local doc, why = job_doc(job_id)
    local state, detail = "busy", why or last
    if doc ~= nil then state, detail = staging_state(doc) end
    if state == "failed" or state == "ready" then return state, detail end
    if state == "unplanned" then
      unplanned_since = unplanned_since or os.time()
      if unplanned_ok and os.time() - unplanned_since >= UNPLANNED_GRACE then
        return "unplanned"
      end
      detail = "no planned nodes yet"
    else
      unplanned_since = nil
    end
    last = detail or last
    if os.time() - start >= limit then return "timeout", last end
    sleep(POLL)
  end
end

-- Stage-in -----------------------------------------------------------------------------

function slurm_bb_job_process(job_script, uid, gid, job_info)
  return slurm.SUCCESS
end

function slurm_bb_pools()
  return slurm.SUCCESS
end

function slurm_bb_setup(job_id, uid, gid, pool, bb_size, job_script, job_info)
  return slurm.SUCCESS
end

function slurm_bb_data_in(job_id, job_script, uid, gid, job_info)
  if not wants_us(job_script) then return slurm.SUCCESS end
  if NEW_API then
    -- 24.05+: slurm_bb_test_data_in polls. Wait only for a first answer, so that a
    -- directive the daemon refuses holds the job at once.
    local state, detail = wait_staged(job_id, UNPLANNED_GRACE, true)
    if state == "failed" then return slurm.ERROR, "hpcstage: " .. detail end
    return slurm.SUCCESS
  end
  log("job %s: waiting for its inputs on the planned nodes", job_id)
  local state, detail = wait_staged(job_id, STAGE_IN_WAIT, true)
  if state == "failed" then return slurm.ERROR, "hpcstage: " .. detail end
  if state == "timeout" then
    return slurm.ERROR, string.format("hpcstage: inputs not staged after %ds (%s)",
                                      STAGE_IN_WAIT, detail)
  end
  log("job %s: stage-in %s", job_id, state == "ready" and "done" or "left to pre_run")
  return slurm.SUCCESS
end

function slurm_bb_test_data_in(job_id, job_script, uid, gid, job_info)
  if not wants_us(job_script) then return slurm.SUCCESS, "" end
  local doc, why = job_doc(job_id)
  if doc == nil then return slurm.SUCCESS, slurm.SLURM_BB_BUSY end  -- daemon busy or down
  local state, detail = staging_state(doc)
  if state == "failed" then return slurm.ERROR, "hpcstage: " .. detail end
  if state == "busy" then return slurm.SUCCESS, slurm.SLURM_BB_BUSY end
  return slurm.SUCCESS, ""  -- ready, or no plan: pre_run stages on the nodes it gets
end

function slurm_bb_real_size(job_id, uid, gid, job_info)
  return slurm.SUCCESS
end

-- Job start ----------------------------------------------------------------------------

function slurm_bb_paths(job_id, job_script, path_file, uid, gid, job_info)
  if not wants_us(job_script) then return slurm.SUCCESS end
  local root = CACHE_DIR
  if root:find("{node}", 1, true) then
    local nodes = type(job_info) == "table" and job_info["nodes"] or nil
    if nodes == nil or not nodes:match("^[%w%-_%.]+$") then
      return slurm.SUCCESS  -- unknown or several nodes: the SPANK plugin or `hpcstage env`
    end
    root = root:gsub("{node}", nodes)
  end
  local f = io.open(path_file, "a")
  if f == nil then return slurm.ERROR, "hpcstage: cannot write " .. path_file end
  f:write(string.format("HPCSTAGE_DIR=%s/jobs/%s\n", root, job_id))
  -- What a container binds to read the inputs (docs/containers.md), as `hpcstage env` says.
  f:write(string.format("HPCSTAGE_MOUNTS=%s/jobs/%s,%s/packed\n", root, job_id, root))
  f:close()
  return slurm.SUCCESS
end

function slurm_bb_pre_run(job_id, job_script, uid, gid, job_info)
  if not wants_us(job_script) then return slurm.SUCCESS end
  -- The daemon learns the allocated nodes from its next queue snapshot.
  local deadline, nodes = os.time() + PRE_RUN_WAIT, nil
  while nodes == nil do
    local doc = job_doc(job_id)
    if doc ~= nil and doc.nodes ~= nil and #doc.nodes > 0 then nodes = doc.nodes end
    if nodes == nil then
      if os.time() >= deadline then
        return slurm.ERROR, "hpcstage: the daemon did not see the job start"
      end
      sleep(POLL)
    end
  end
  for _, node in ipairs(nodes) do
    local left = math.max(1, deadline - os.time())
    local cmd = string.format("%s env --config %s --job %s --node %s --timeout %d",
                              shell_quote(HPCSTAGE), shell_quote(CONFIG), shell_quote(job_id),
                              shell_quote(node), left)
    -- Its stdout is for a shell's eval (`exit 1` on failure); the reason is on stderr.
    local ok, out = run("(" .. cmd .. " >/dev/null)")
    if not ok then
      -- "hpcstage: job N cannot start: why", as the job itself would print it
      return slurm.ERROR, last_line(out)
    end
  end
  log("job %s: inputs ready on %s", job_id, table.concat(nodes, ","))
  return slurm.SUCCESS
end

-- Job end ------------------------------------------------------------------------------

function slurm_bb_post_run(job_id, job_script, uid, gid, job_info)
  return slurm.SUCCESS
end

function slurm_bb_data_out(job_id, job_script, uid, gid, job_info)
  -- The daemon starts the stage-out when Slurm reports the job ended, i.e. after this
  -- returns; `hpcstage status JOB` follows it. Waiting here would deadlock.
  return slurm.SUCCESS
end

function slurm_bb_test_data_out(job_id, job_script, uid, gid, job_info)
  return slurm.SUCCESS, ""
end

function slurm_bb_job_teardown(job_id, job_script, hurry, uid, gid)
  return slurm.SUCCESS
end

-- scontrol show bbstat JOBID: the daemon's view of that job, for its owner (and admins).
-- This runs as SlurmUser, an API admin, so the daemon is asked to answer as the uid that
-- typed it. 24.05+ passes that uid and gid (as text) before the words typed; 22.05 passes
-- only the words, which the user chooses ("bbstat 0 0 JOB" would claim root), so nobody
-- learns a job's staging this way there.
function slurm_bb_get_status(...)
  local args = { ... }
  local uid = nil
  if NEW_API then
    uid = tonumber(table.remove(args, 1)); table.remove(args, 1)  -- uid, gid
  end
  local job_id = args[1]
  if job_id == nil or not tostring(job_id):match("^%d+$") then
    return slurm.SUCCESS, NAME .. ": usage: scontrol show bbstat JOBID\n"
  end
  if uid == nil then
    return slurm.SUCCESS, NAME .. ": this Slurm does not say who asks; run `hpcstage status "
                          .. job_id .. "` instead\n"
  end
  local cmd = string.format("%s status --config %s --for-uid %d %s", shell_quote(HPCSTAGE),
                            shell_quote(CONFIG), uid, shell_quote(job_id))
  local _, out = run(cmd)
  return slurm.SUCCESS, out
end
