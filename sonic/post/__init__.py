"""After the sampler: lip-sync measurement and correction (`lipsync`), motion smoothing (`smoothing`), frames on
disk for long videos (`frames`) and MP4 reading and writing (`video_io`)."""
