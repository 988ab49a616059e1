"""Results that outlive a run: the one schema of genflow's JSON lines (``records.py``), the leaderboard's
history (``history.py``), its regression gate (``gate.py``) and its web page (``page.py``)."""
