"""``hf-tokred train mrt5``: (being written; the helper replaces this whole file)."""


def add_train_command(subparsers) -> None:
    subparsers.add_parser("mrt5", help="(being written)").set_defaults(handler=run)


def run(args) -> int:
    raise RuntimeError("hf-tokred train mrt5 is being written")
