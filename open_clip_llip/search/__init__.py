"""Search over large galleries: a two-stage Llip retrieval index (``index``)."""
