"""The tracker's side: recognizers, input-transform countermeasures and model adaptation."""
