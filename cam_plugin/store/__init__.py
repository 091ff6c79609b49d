"""Where runs keep what they produce: files under a directory owned by one
(dataset, run), and one update per sample document."""
