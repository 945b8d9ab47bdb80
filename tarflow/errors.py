"""The one exception type for bad user input; the CLI prints it as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input a user can fix: the message names the problem (and, where it helps, the fix).

    The library speaks in its own parameter names ("img_size", "force=True"), never in command-line
    flags, because it is called from Python as often as from the CLI. `setting` names the
    parameter(s) the message is about, comma-separated in the order the message names them
    ("denoise,noise_std"; None when it is about no parameter), so a front end can show its own
    spelling of each (e.g. "noise_std" as "--noise-std", "force=True" as "--force").
    """

    def __init__(self, message: str, *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting
