"""python -m minillm.generate: generate.py's command, for an installed minillm (`python -m minillm.generate --help`)."""

if __name__ == "__main__":
    try:
        from minillm.launch import generate

        generate()
    except KeyboardInterrupt:  # Ctrl-C before even the launcher was loaded
        raise SystemExit(130) from None
