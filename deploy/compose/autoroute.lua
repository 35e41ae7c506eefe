-- Orthanc auto-routing: every CT series, once stable (no new instance for StableAge
-- seconds), is sent to the modality "nodal" (C-STORE). Only CT: nodal's results (SEG, SR,
-- secondary capture) coming back into the study are never sent on, so nothing loops.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    print('autoroute: CT series ' .. seriesId .. ' -> nodal')
    RestApiPost('/modalities/nodal/store',
                DumpJson({ Resources = { seriesId }, Asynchronous = true }, true))
  end
end
