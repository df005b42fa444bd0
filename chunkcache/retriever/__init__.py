"""Retrieval: chunking, embeddings, the faiss index and the docstore (grown by the retriever issue)."""
