"""What the loop trains: pre-training (any method), tokenizer training, fine-tuning and segmentation, each a `Task`
with its command's entry (`pretrain`, `train_tokenizer`, `finetune`, `segment`), and the encoders they load."""
