//! The layerfs union filesystem.
