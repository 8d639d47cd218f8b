"""The analysis copy the later steps read (reversible passes), and the shapes of its tensors."""
