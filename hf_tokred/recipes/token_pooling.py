"""``hf-tokred train token_pooling``: (being written; the helper replaces this whole file)."""


def add_train_command(subparsers) -> None:
    subparsers.add_parser("token_pooling", help="(being written)").set_defaults(handler=run)


def run(args) -> int:
    raise RuntimeError("hf-tokred train token_pooling is being written")
