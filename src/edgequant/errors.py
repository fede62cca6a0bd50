"""The one exception type for user-facing problems.

Every error a user can cause (a wrong path, an unknown spec, a corrupt file) is raised as an
`EdgequantError` carrying the problem and the fix. The CLI prints those two lines and exits
non-zero; anything else is a bug: one line, and its traceback in a crash log.
"""

DISK_FULL_FIX = ("free space, or write elsewhere (-o PATH, or EDGEQUANT_HOME for the cache); "
                 "nothing half-written was kept")


class EdgequantError(Exception):
    def __init__(self, problem: str, fix: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem}\n  fix: {self.fix}" if self.fix else self.problem
