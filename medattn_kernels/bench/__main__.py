from .cli import main

if __name__ == "__main__":  # a spawned child (the --monai peak measurement) imports this module again
    raise SystemExit(main())
