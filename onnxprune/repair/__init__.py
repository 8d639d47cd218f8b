"""What is done to the surviving weights after an edit: least-squares refits, distillation, fine-tuning."""
