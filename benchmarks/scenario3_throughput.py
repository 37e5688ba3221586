"""Scenario 3: Drain throughput and scaling. Arguments go to `asyncdump bench` (try --quick or --help)."""

if __name__ == "__main__":
    from _scenario import run

    run(3)
