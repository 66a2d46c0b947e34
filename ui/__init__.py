"""The clipsearch search page: a Streamlit app (``app.py``) started by ``clipsearch ui``; it only calls ``Searcher``."""
