"""Feature extraction with caching (and, later, FAISS index build/search and the search service)."""
