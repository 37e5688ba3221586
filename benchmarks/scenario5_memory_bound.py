"""Scenario 5: Memory bound under a flood. Arguments go to `asyncdump bench` (try --quick or --help)."""

if __name__ == "__main__":
    from _scenario import run

    run(5)
