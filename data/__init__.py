"""longtrain.data: from text to batches. batch.py (what a batch is: its keys and IGNORE),
sources.py and tokenizer.py (text and token ids), prepare.py (Arrow shards + manifest),
shards.py (reading and verifying them), check.py (`longtrain check-data`), loader.py (packed,
shuffled, resumable, dp-sharded batches), passkey.py (the retrieval task). Imports only files/."""
