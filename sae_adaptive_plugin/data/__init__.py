"""Local models and text corpora: load and save without the Hub."""
