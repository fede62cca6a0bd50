"""The command line's verbs, one module each: `add(sub)` declares the verb's arguments (defaults
read from the config it builds, so each is stated once) and `run(args)` turns them into one call
of the Python API. Only light modules are imported here, so `edgequant --help` loads no engine."""

# In the order `edgequant --help` lists them.
VERBS = ("inspect", "hardware", "recommend", "optimize", "verify", "run", "finetune", "convert", "imatrix", "evaluate", "bench",
         "results", "serve")
