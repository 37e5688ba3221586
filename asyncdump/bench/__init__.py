"""``asyncdump bench``: asyncdump side by side with what users would otherwise write.

    contenders.py   one class per way of saving images (none, pil_sync, cv2_sync, ...)
    measure.py      timing summaries, the all-process RSS sampler, synthetic images
    scenarios.py    the five scenarios of the benchmark issue, each in interleaved rounds
    storage.py      ``asyncdump bench --root DIR``: sustained rate and a worker recommendation
    object_store.py scenario 9: datasets and a loop on an S3 store (``--store URL``, or a
                    moto server it starts) vs plain uploads of the same bytes
    report.py       Markdown tables, JSON, the chart, the targets
    cli.py          the ``bench`` sub-command

Nothing here is imported by ``import asyncdump``; torch is imported inside functions.
"""
