"""What the user brings: image folders and .npz files, Keras/SavedModel/subclassed models (checked before loading), layer selection."""
