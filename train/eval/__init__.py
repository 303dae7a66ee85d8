"""Quality analyses of a distilled student against its teacher: ``python -m train.eval <analysis> ...``.

* ``tsne`` (:mod:`.tsne`) — t-SNE of mean-pooled embeddings, teacher and students in one plot, and the
  per-prompt nearest-neighbour agreement between the spaces (paper Fig. 6);
* ``collapse`` (:mod:`.collapse`) — pairwise cosine matrices on near-concept probes, flagged pairs (Fig. 9);
* ``attention`` (:mod:`.attention`) — Flux joint-attention maps per token at one denoising step (Fig. 7);
* ``generate`` (:mod:`.generate`) — prompts x encoders with one seed and guidance, a labelled grid (Figs. 11-14);
* ``clipscore`` (:mod:`.clipscore`) — CLIP score with a local CLIP model, images in T2I-CompBench's layout;
* ``fid`` (:mod:`.fid`, :mod:`.inception`) — FID against reference images or statistics (supplement Table 7);
* ``study`` (:mod:`.study`) — a blind A/B preference study served as a local web page, and its report.

Encoders are named ``[LABEL=]PATH`` (:mod:`.encoders`); pipelines swap their T5 slot between the teacher
and the students (:mod:`.pipelines`).
"""
