"""Run the command line once per argument list, each in a forked copy of one warm process.

``python tests/cli_fork_runner.py CASES.json RESULTS.json``: CASES holds a list of argument
lists; for each, a child process (forked after the imports, so each run costs its own work
only) runs the ``medflow`` entry point with those arguments, its standard output and error going to
files. RESULTS receives ``[[exit status, stdout, stderr], ...]`` in the same order. The tests
use it to run the real entry point on many bad arguments without paying the start-up of the
interpreter and its imports each time.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def main() -> None:
    cases_path, results_path = sys.argv[1:3]
    with open(cases_path, encoding="utf-8") as f:
        cases = json.load(f)
    import medflow.encoders
    import medflow.flows.cli  # noqa: F401  (warm: the command line and Prefect)
    from medflow.flows.entry import main as medflow_main

    results = []
    with tempfile.TemporaryDirectory(prefix="medflow-cli-runner-") as tmp:
        for i, args in enumerate(cases):
            out_path, err_path = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: one command line run, then exit with its status
                code = 70
                try:
                    with open(out_path, "w") as out, open(err_path, "w") as err:
                        os.dup2(out.fileno(), 1)
                        os.dup2(err.fileno(), 2)
                        sys.argv = ["medflow", *args]
                        try:
                            medflow_main()
                            code = 0
                        except SystemExit as e:
                            code = (
                                e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                            )
                        except BaseException:  # what escaped the command line, for the test
                            import traceback

                            traceback.print_exc()
                            code = 70
                        finally:
                            sys.stdout.flush()
                            sys.stderr.flush()
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            with open(out_path) as f_out, open(err_path) as f_err:
                results.append([code, f_out.read(), f_err.read()])
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
