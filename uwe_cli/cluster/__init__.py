"""Running uwe on a Ray cluster: exact selection over sharded pools (`select.py`) and batch inference
(`extract.py`), with results identical to a local run. Ray is an optional extra (`uwe-cli[ray]`)."""
