"""Retrieval at scale: a resumable feature cache (`features`), FAISS index build (`build`), search and the web page."""
