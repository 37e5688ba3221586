"""Scenario 2: CPU-bound loop. Arguments go to `asyncdump bench` (try --quick or --help)."""

if __name__ == "__main__":
    from _scenario import run

    run(2)
