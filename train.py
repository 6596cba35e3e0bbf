"""Train a GPT: `python train.py --help` lists every option."""

if __name__ == "__main__":
    try:
        from minillm.launch import run_command

        run_command("minillm.train_cli")
    except KeyboardInterrupt:  # Ctrl-C before even the launcher was loaded
        raise SystemExit(130) from None
