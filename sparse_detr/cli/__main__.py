"""``python -m sparse_detr.cli`` (what torchrun starts): the ``sdetr`` command line."""

from sparse_detr.cli import main

main()
