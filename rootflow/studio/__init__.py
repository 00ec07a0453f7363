"""Correction studio: fix masks in the browser with a few clicks, and feed every correction
back into training (``rootflow studio``; see docs/studio.md).

:mod:`~rootflow.studio.queue` (images and their proposals, ordering),
:mod:`~rootflow.studio.engines` (RootSAM refine, forest scribble retraining, NoC clicker),
:mod:`~rootflow.studio.session` (editing state, undo/redo, accept -> lake),
:mod:`~rootflow.studio.annotations` (annotations -> training manifest, figures),
:mod:`~rootflow.studio.app` (the web app, request validation).
"""
