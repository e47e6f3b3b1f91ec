//! # imglish-train: stage 4, the streaming masked-image-modeling trainer
