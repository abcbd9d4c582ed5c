"""`python -m app.cli`: what the workers and tests start."""

from app.cli import main

main()
