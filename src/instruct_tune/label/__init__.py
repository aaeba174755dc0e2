"""The labelling app: people rank K policy responses per prompt, as InstructGPT's labellers did.

    instruct-tune label new-project round1 --prompts data/tiny/heldout_prompts.jsonl --policy outputs/tiny/sft -k 4
    instruct-tune label add-labeler round1 alice          # prints alice's token, once
    instruct-tune label serve round1 --port 8765          # http://127.0.0.1:8765, log in with the token
    instruct-tune label stats round1
    instruct-tune label export round1 --out rankings.jsonl --demonstrations demos.jsonl

A project is one SQLite file, ``labels/<NAME>.sqlite`` under the working directory unless ``--db`` (or a
PROJECT argument that is a path) names another. Modules, one job each:

- ``db``: schema, connections (WAL, every write committed before a response returns), tokens (hashed);
- ``assign``: which item a labeller gets next (in a ``BEGIN IMMEDIATE`` transaction) and progress;
- ``labels``: checking, storing and undoing a submitted label;
- ``agreement``: pairwise agreement and Krippendorff's ordinal alpha; ``stats``: both over a project;
- ``export``: merging labellers' rankings into the ``ranking`` format, demonstrations, the Hub push;
- ``app`` (Starlette routes) and ``static/label.html`` (the one page); ``sampling``: K responses of a
  policy run folder; ``scripted``: a labeller in code over the same HTTP API; ``cli``: the commands.
"""
