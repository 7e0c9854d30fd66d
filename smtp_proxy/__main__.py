"""Allow ``python -m smtp_proxy``."""

from smtp_proxy.cli import main

main()
