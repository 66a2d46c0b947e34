"""The indexing pipeline: crawl folders, plan the work, decode images, encode and store them."""
