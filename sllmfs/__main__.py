from sllmfs.cli import main

if __name__ == "__main__":  # SGLang (save --backend sglang) spawns processes that may re-import this
    main()
