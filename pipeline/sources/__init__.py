"""Input rows for the two jobs, one room per job:

- ``keys``: the key and seed scheme (and the packed binary keys resume holds);
- ``prompt_files``: prompt file formats -> prompt rows;
- ``image_files``: image inputs (files, Parquet, WebDataset) -> image rows;
- ``datasource``: the same readers as streaming Ray Data read tasks.

Import from the module you need: ``keys`` pulls in neither Ray nor the readers.
"""
