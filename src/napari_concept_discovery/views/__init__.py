"""Qt-free view models the widgets draw: overlays, feature views, the plate map, the session state, thumbnails, colours, forms and the workspace's paths."""
