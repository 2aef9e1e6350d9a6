"""tokenline central: ingests token messages into SQL, searches them by example image or text, keeps originals."""
