"""Everything inside one training process: data, augmentation, model, methods, loop, evaluation."""
