"""longtrain.models: the language model and its parts. config.py (ModelConfig), layers.py,
rope.py, moe.py, moh.py, actquant.py, transformer.py (LongLM, built whole; build_model),
parallelize.py (a built model laid out over a mesh, one step per kind of parallelism), loss.py
(the chunked loss and the step-loss rule), stages.py (a pipeline stage), hf/ (Hugging Face
interchange). Imports parallel/, files/ and data/batch.py (what a batch is); never
configuration, training, checkpoint or launching code."""
