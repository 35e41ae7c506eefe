"""nodal as a client of the PACS: query (C-FIND, QIDO-RS) and retrieve (C-GET, C-MOVE, WADO-RS).

Used by the job function to find and fetch a study's prior (`prior`) and by
`POST /api/retrieve` to fetch a study on demand. See docs/follow-up.md.
"""
