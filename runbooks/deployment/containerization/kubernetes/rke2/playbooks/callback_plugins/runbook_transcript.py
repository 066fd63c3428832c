# Per-host transcripts of an ansible-playbook run, for runbook's evidence bundle: one
# `<host>.jsonl` (a line per task result) and one `<host>.log` (a readable line per task) in
# RUNBOOK_TRANSCRIPT_DIR, plus `summary.json` with the play recap. rke2-vm-deploy `collect`s the
# directory. Results Ansible censors (no_log) stay censored; diffs are never written.
from __future__ import annotations

DOCUMENTATION = """
    name: runbook_transcript
    type: notification
    short_description: write per-host task results into a directory for runbook's evidence
    description:
      - One JSON line and one text line per task result and host, and a summary of the recap.
    options:
      directory:
        description: Where the transcripts go.
        default: ansible-transcripts
        env:
          - name: RUNBOOK_TRANSCRIPT_DIR
"""

import json
import os
import re
import time

from ansible.plugins.callback import CallbackBase

# Keys copied from a result: enough to see what happened, without diffs or module internals.
_KEYS = ("msg", "rc", "stdout", "stderr", "failed_when_result", "skip_reason", "censored", "attempts")
# Host names become file names: keep them to a safe alphabet.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "runbook_transcript"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dir = None

    def set_options(self, task_keys=None, var_options=None, direct=None):
        super().set_options(task_keys=task_keys, var_options=var_options, direct=direct)
        self._dir = self.get_option("directory")
        os.makedirs(self._dir, exist_ok=True)

    def _write(self, result, status):
        host = _UNSAFE.sub("_", result._host.get_name())
        raw = result._result
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": result._host.get_name(),
            "task": result._task.get_name(),
            "action": result._task.action,
            "status": status,
            "changed": bool(raw.get("changed", False)),
        }
        for key in _KEYS:
            if key in raw:
                entry[key] = raw[key]
        if "results" in raw:
            entry["items"] = [
                {"item": str(r.get("item", ""))[:200], "changed": bool(r.get("changed", False)),
                 "failed": bool(r.get("failed", False)), "skipped": bool(r.get("skipped", False))}
                for r in raw["results"] if isinstance(r, dict)
            ]
        with open(os.path.join(self._dir, host + ".jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str, sort_keys=True) + "\n")
        line = "%s %-11s %s%s" % (entry["time"], status, entry["task"], " (changed)" if entry["changed"] else "")
        if status in ("failed", "unreachable") and "msg" in entry:
            line += ": " + str(entry["msg"]).replace("\n", " ")[:500]
        with open(os.path.join(self._dir, host + ".log"), "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def v2_runner_on_ok(self, result):
        self._write(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._write(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._write(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._write(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        summary = {h: stats.summarize(h) for h in sorted(stats.processed)}
        with open(os.path.join(self._dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
