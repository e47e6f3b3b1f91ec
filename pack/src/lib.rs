//! # imglish-pack: stage 3, token shards and the streaming reader
//!
//! Packs token sequences into zstd-compressed Arrow IPC shards with an index, and streams them back.
