/* Run the helper with a deadline; see run.h. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "run.h"

static void say(const char *text)
{
	ssize_t ignored = write(STDERR_FILENO, text, strlen(text));
	(void)ignored;
}

/* slurmstepd may run us with euid = user and saved uid = root: become the user for good. */
static int become_user(const struct hs_cmd *cmd)
{
	if (getuid() != 0 && geteuid() != 0 && getuid() == cmd->uid)
		return 0; /* not privileged at all: already the user */
	if (geteuid() != 0 && seteuid(0) < 0)
		return -1;
	if (setgroups(cmd->ngroups, cmd->groups) < 0 || setgid(cmd->gid) < 0 ||
	    setuid(cmd->uid) < 0)
		return -1;
	if (getuid() != cmd->uid || geteuid() != cmd->uid)
		return -1;
	return 0;
}

/* In the child: only async-signal-safe calls (the parent may have threads). */
static void child(const struct hs_cmd *cmd, int out_fd, int err_fd)
{
	sigset_t none;
	int null_fd = open("/dev/null", O_RDONLY);

	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	setpgid(0, 0);
	if (null_fd < 0 || dup2(null_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0)
		_exit(126);
	if (close_range(3, ~0U, 0) < 0)
		for (int fd = 3; fd < 4096; fd++)
			close(fd);
	if (become_user(cmd) < 0) {
		say("hpcstage: cannot switch to the job's user to run the helper\n");
		_exit(126);
	}
	execve(cmd->argv[0], cmd->argv, cmd->envp);
	say("hpcstage: cannot execute the helper ");
	say(cmd->argv[0]);
	say("\n");
	_exit(127);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Append what fits of data to buf (len = capacity incl. NUL), keeping it terminated. */
static void append(char *buf, size_t len, const char *data, size_t n)
{
	size_t have = strlen(buf);
	size_t room = len - 1 - have;

	if (n > room)
		n = room;
	memcpy(buf + have, data, n);
	buf[have + n] = '\0';
}

/* Stderr is read by chunks: keep the line being read and the last complete one. */
struct line_tail {
	char cur[HS_LINE_LEN];
	char *last;
	size_t last_len;
};

static void tail_feed(struct line_tail *t, const char *data, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (data[i] != '\n') {
			append(t->cur, sizeof(t->cur), data + i, 1);
			continue;
		}
		if (t->cur[0] != '\0') {
			strncpy(t->last, t->cur, t->last_len - 1);
			t->last[t->last_len - 1] = '\0';
		}
		t->cur[0] = '\0';
	}
}

static void tail_end(struct line_tail *t)
{
	tail_feed(t, "\n", 1);
}

/* Read both pipes until they close or the deadline passes; 1 if it passed. */
static int pump(int out_fd, int err_fd, double deadline, struct hs_result *res)
{
	struct pollfd fds[2] = { { out_fd, POLLIN, 0 }, { err_fd, POLLIN, 0 } };
	struct line_tail tail = { .cur = "", .last = res->last_err, .last_len = HS_LINE_LEN };
	char buf[4096];

	while (fds[0].fd >= 0 || fds[1].fd >= 0) {
		double left = deadline - now();
		if (left <= 0)
			return 1;
		int ready = poll(fds, 2, (int)(left * 1000) + 1);
		if (ready < 0 && errno != EINTR)
			return 1;
		for (int i = 0; ready > 0 && i < 2; i++) {
			if (fds[i].fd < 0 || fds[i].revents == 0)
				continue;
			ssize_t n = read(fds[i].fd, buf, sizeof(buf));
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				fds[i].fd = -1;
				continue;
			}
			if (i == 0)
				append(res->out, sizeof(res->out), buf, (size_t)n);
			else
				tail_feed(&tail, buf, (size_t)n);
		}
	}
	tail_end(&tail);
	return 0;
}

static int reap(pid_t pid, int *status)
{
	while (waitpid(pid, status, 0) < 0)
		if (errno != EINTR)
			return -1;
	return 0;
}

int hs_run(const struct hs_cmd *cmd, struct hs_result *res)
{
	int out[2] = { -1, -1 }, err[2] = { -1, -1 };
	pid_t pid;

	memset(res, 0, sizeof(*res));
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0)
		goto fail;
	pid = fork();
	if (pid < 0)
		goto fail;
	if (pid == 0)
		child(cmd, out[1], err[1]);
	close(out[1]);
	close(err[1]);
	res->timed_out = pump(out[0], err[0], now() + cmd->timeout, res);
	if (res->timed_out)
		kill(-pid, SIGKILL);
	close(out[0]);
	close(err[0]);
	if (reap(pid, &res->status) < 0)
		return -1;
	return 0;
fail:
	for (int i = 0; i < 2; i++) {
		if (out[i] >= 0)
			close(out[i]);
		if (err[i] >= 0)
			close(err[i]);
	}
	return -1;
}

/* Undo POSIX shell quoting as Python's shlex.quote writes it: 'a'"'"'b' or bare words. */
static int unquote(const char *s, char *buf, size_t len)
{
	size_t n = 0;

	while (*s != '\0' && *s != '\n') {
		char quote = (*s == '\'' || *s == '"') ? *s++ : 0;
		while (*s != '\0' && *s != '\n' && (quote ? *s != quote : *s != '\'' && *s != '"')) {
			if (!quote && (*s == '\\' || *s == ' ' || *s == '$' || *s == '`'))
				return -1; /* not something shlex.quote writes */
			if (quote == '"' && (*s == '\\' || *s == '$' || *s == '`'))
				return -1;
			if (n + 1 >= len)
				return -1;
			buf[n++] = *s++;
		}
		if (quote) {
			if (*s != quote)
				return -1;
			s++;
		}
	}
	buf[n] = '\0';
	return n > 0 ? 0 : -1;
}

int hs_find_export(const char *out, const char *name, char *buf, size_t len)
{
	size_t name_len = strlen(name);
	const char *line = out;

	while (line != NULL && *line != '\0') {
		if (strncmp(line, "export ", 7) == 0 && strncmp(line + 7, name, name_len) == 0 &&
		    line[7 + name_len] == '=')
			return unquote(line + 8 + name_len, buf, len);
		line = strchr(line, '\n');
		if (line != NULL)
			line++;
	}
	return -1;
}
