"""Run a command with transparent huge pages disabled for it and its children (prctl PR_SET_THP_DISABLE, inherited across fork and exec)."""
import ctypes, os, sys
PR_SET_THP_DISABLE = 41
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_THP_DISABLE) failed: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
