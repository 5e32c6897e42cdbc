"""What the model checks share: running `peregrine`, and reporting checks
as `check NAME ... ok|FAILED` with a closing line in cargo's format."""

import subprocess
import sys
import time


def run(*args):
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{done.stderr}")
    return done


def report(checks):
    """Runs each (name, check) in turn, a check returning what it showed or
    raising what failed; the rest run whatever one does. Exits 1 on any
    failure."""
    passed = failed = 0
    started = time.time()
    for name, check in checks:
        try:
            print(f"check {name} ... ok ({check()})")
            passed += 1
        except Exception as e:  # a check's failure is reported, the rest still run
            print(f"check {name} ... FAILED\n    {e}")
            failed += 1
    verdict = "ok" if failed == 0 else "FAILED"
    print(f"test result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; "
          f"0 filtered out; finished in {time.time() - started:.2f}s")
    sys.exit(1 if failed else 0)
