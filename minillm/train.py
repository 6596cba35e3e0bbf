"""python -m minillm.train: train.py's command, for an installed minillm (`python -m minillm.train --help`)."""

if __name__ == "__main__":
    try:
        from minillm.launch import train

        train()
    except KeyboardInterrupt:  # Ctrl-C before even the launcher was loaded
        raise SystemExit(130) from None
