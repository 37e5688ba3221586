"""Scenario 4: Submit cost vs memcpy. Arguments go to `asyncdump bench` (try --quick or --help)."""

if __name__ == "__main__":
    from _scenario import run

    run(4)
