% if files:
<div class="attachments">
% for f in files:
%   if f['type'].startswith('image/'):
  <a class="thumb" href="{{get('files_at', '')}}/attachments/{{f['id']}}" target="_blank" rel="noopener"><img src="{{get('files_at', '')}}/attachments/{{f['id']}}" alt="{{f['name']}}" loading="lazy"></a>
%   else:
%     text = bytes(f['data'] or b'').decode('utf-8', 'replace')
  <details class="file">
    <summary><span class="file-name">{{f['name']}}</span> <span class="size">({{'%.1f MB' % (f['size'] / 2**20) if (f['size'] or 0) >= 2**20 else '%d KB' % max(1, round((f['size'] or 0) / 1024))}})</span></summary>
    <pre tabindex="0">{{text[:20000]}}</pre>
%     if len(text) > 20000:
    <p><a href="{{get('files_at', '')}}/attachments/{{f['id']}}" target="_blank" rel="noopener">The whole file</a></p>
%     end
  </details>
%   end
% end
</div>
% end
