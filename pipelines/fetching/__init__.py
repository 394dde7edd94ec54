"""Network fetching shared by the pipelines: host lookup and URL policy, URL-list pages, img2dataset images."""
